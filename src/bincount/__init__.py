"""bincount: count the objects in warehouse bin photos (Amazon Bin Image Dataset)."""

__version__ = "0.1.0"
