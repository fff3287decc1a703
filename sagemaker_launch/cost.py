"""What a SageMaker job costs: instance-hours x on-demand and estimated spot price.

Usage:
    python -m sagemaker_launch.cost                                    # every instance type, gpu_single
    python -m sagemaker_launch.cost sagemaker=gpu_multi sagemaker.instance_count=4 sagemaker.expected_hours=3

``key=value`` arguments are Hydra overrides of ``conf/launch.yaml``; its ``sagemaker`` config is priced on
every training instance type for ``sagemaker.expected_hours``, else ``sagemaker.max_run_hours``. Prices come
from ``conf/sagemaker/prices.yaml`` (dated, with its source); nothing is fetched.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bincount.config import compose, config_dir

PRICES_FILE = "sagemaker/prices.yaml"


def load_prices() -> DictConfig:
    """The price table, ``conf/sagemaker/prices.yaml``."""
    return OmegaConf.load(Path(config_dir()) / PRICES_FILE)


def instance_gpus(instance_type: str, prices: DictConfig | None = None) -> int:
    """GPUs of ``instance_type`` per the price table.

    Raises:
        KeyError: If the table doesn't know the type (set ``sagemaker.processes_per_instance``).
    """
    prices = prices or load_prices()
    for table in ("training", "hosting"):
        if instance_type in prices[table]:
            return int(prices[table][instance_type].gpus)
    raise KeyError(f"{instance_type} is not in conf/{PRICES_FILE}: add it, or set sagemaker.processes_per_instance")


# instance families by their letters (ml.<family><generation>...): NVIDIA GPUs, or none
GPU_FAMILIES = ("p", "g")
CPU_FAMILIES = ("m", "c", "r", "t")


def has_gpus(instance_type: str, prices: DictConfig | None = None) -> bool:
    """Whether ``instance_type`` has NVIDIA GPUs: the price table's ``gpus``, else its family
    (``ml.p*``, ``ml.g*``: yes; ``ml.m*``, ``ml.c*``, ``ml.r*``, ``ml.t*``: no).

    Raises:
        KeyError: A type neither the table nor the family rule knows (e.g. ``ml.trn1.2xlarge``).
    """
    try:
        return instance_gpus(instance_type, prices) > 0
    except KeyError:
        match = re.fullmatch(r"ml\.([a-z]+)\d[a-z0-9-]*\.[a-z0-9]+", instance_type)
        family = match.group(1) if match else ""
        if family in GPU_FAMILIES or family in CPU_FAMILIES:
            return family in GPU_FAMILIES
        raise KeyError(f"can't tell whether {instance_type} has GPUs: add it to conf/{PRICES_FILE}") from None


def training_precision(instance_type: str, prices: DictConfig | None = None) -> tuple[str | None, str]:
    """The Lightning precision a job on ``instance_type`` trains in, from the table's ``bf16``.

    Returns:
        ``(precision, reason)``: ``"bf16-mixed"`` where the instance computes in bfloat16,
        else ``"16-mixed"`` (GPU) or ``"32-true"`` (CPU); ``(None, reason)`` when the table
        doesn't say, so the job decides on the instance (``trainer.precision=auto``).
    """
    prices = prices or load_prices()
    entry = prices.training.get(instance_type)
    if entry is None or entry.get("bf16") is None:
        return None, f"{instance_type}: not in conf/{PRICES_FILE}, decided on the instance"
    if entry.bf16:
        return "bf16-mixed", f"{instance_type} computes in bfloat16"
    if entry.gpus > 0:
        return "16-mixed", f"{instance_type}'s GPUs have no native bfloat16"
    return "32-true", f"{instance_type}'s CPUs have no bfloat16 instructions"


@dataclass(frozen=True)
class CostLine:
    """One instance type's estimate: ``instance_count`` x ``instance_type`` for ``hours`` (wall clock) at
    ``usd_per_hour`` (on demand, one instance), ``spot_savings`` the fraction managed spot saves (assumed)."""

    instance_type: str
    instance_count: int
    hours: float
    usd_per_hour: float
    spot_savings: float

    @property
    def instance_hours(self) -> float:
        return self.instance_count * self.hours

    @property
    def on_demand_usd(self) -> float:
        return self.instance_hours * self.usd_per_hour

    @property
    def spot_usd(self) -> float:
        return self.on_demand_usd * (1 - self.spot_savings)


def estimate(instance_type: str, instance_count: int, hours: float, *, table: str = "training",
             prices: DictConfig | None = None) -> CostLine:
    """The cost of ``instance_count`` x ``instance_type`` for ``hours``.

    Raises:
        KeyError: If the price table doesn't list ``instance_type``.
    """
    prices = prices or load_prices()
    if instance_type not in prices[table]:
        raise KeyError(f"no {table} price for {instance_type} in conf/{PRICES_FILE}")
    return CostLine(instance_type, int(instance_count), float(hours), float(prices[table][instance_type].usd_per_hour),
                    float(prices.spot_savings))


def hosting_text(instance_type: str, instance_count: int, until: str) -> str:
    """``"<count> x <type> cost about <USD> USD per hour <until>"`` at the table's on-demand hosting
    price (endpoints, transform jobs), or the reason the table has none."""
    try:
        line = estimate(instance_type, instance_count, 1, table="hosting")
    except KeyError as err:
        return str(err.args[0])
    return f"{instance_count} x {instance_type} cost about {line.on_demand_usd:.3f} USD per hour {until}"


def format_table(lines: list[CostLine], prices: DictConfig | None = None, *, mark: str | None = None) -> str:
    """A plain-text table of ``lines`` with the price table's date and source underneath."""
    prices = prices or load_prices()
    rows = [f"{'instance type':<18} {'count':>5} {'hours':>6} {'inst-h':>7} {'USD/h':>7} {'on-demand':>10} {'spot (est.)':>11}"]
    for c in lines:
        star = " <-" if c.instance_type == mark else ""
        rows.append(f"{c.instance_type:<18} {c.instance_count:>5} {c.hours:>6.1f} {c.instance_hours:>7.1f} "
                    f"{c.usd_per_hour:>7.3f} {c.on_demand_usd:>10.2f} {c.spot_usd:>11.2f}{star}")
    rows.append(f"prices: {prices.region} {prices.currency} on-demand as of {prices.date} ({prices.source}); "
                f"spot assumes {prices.spot_savings:.0%} saved")
    return "\n".join(rows)


def job_hours(sm: DictConfig) -> float:
    """Hours a job is priced for: ``expected_hours``, else ``max_run_hours`` (the upper bound)."""
    return float(sm.expected_hours if sm.get("expected_hours") is not None else sm.max_run_hours)


def main(argv: list[str] | None = None) -> str:
    """Print the cost of the composed ``sagemaker`` config on every training instance type."""
    parser = argparse.ArgumentParser(prog="python -m sagemaker_launch.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _, overrides = parser.parse_known_args(argv)  # None: sys.argv[1:]
    cfg = compose("launch", overrides)
    sm, prices = cfg.sagemaker, load_prices()
    hours = job_hours(sm)
    lines = [estimate(t, sm.instance_count, hours, prices=prices) for t in prices.training]
    text = format_table(lines, prices, mark=sm.instance_type)
    print(text)
    return text


if __name__ == "__main__":
    from sagemaker_launch import run

    run(main)
