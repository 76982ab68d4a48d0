"""``python -m lightning_lora.federated ROLE [HYDRA OVERRIDES]``: Hydra entry point.

Roles: ``simulate`` (N clients in this process), ``server`` (a real Flower server),
``client`` (a real Flower client, ``partition_id=k``). Config: ``conf/federated/config.yaml`` and
``conf/federated/task/*.yaml``. A real run on one machine::

    python -m lightning_lora.federated server task=tiny num_clients=2 num_rounds=1 &
    python -m lightning_lora.federated client task=tiny num_clients=2 num_rounds=1 partition_id=0 &
    python -m lightning_lora.federated client task=tiny num_clients=2 num_rounds=1 partition_id=1

Across machines, give the server ``address=0.0.0.0:8080`` and the clients ``address=HOST:8080``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROLES = ("simulate", "server", "client")
USAGE = f"usage: python -m lightning_lora.federated {{{'|'.join(ROLES)}}} [HYDRA OVERRIDES ...]\n"


def config_from(cfg: Any):
    """A :class:`FederationConfig` from the composed Hydra config."""
    from omegaconf import OmegaConf

    from .simulation import FederationConfig

    c = OmegaConf.to_container(cfg, resolve=True)
    adapter = {k: v for k, v in c["adapter"].items() if v is not None or k in ("target_modules", "modules_to_save")}
    dp = c["dp"]
    device = c["device"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return FederationConfig(
        task=c["task"]["name"], task_options={k: v for k, v in (c["task"].get("options") or {}).items()},
        method=c["method"], adapter=adapter, num_clients=c["num_clients"], dirichlet_alpha=c["dirichlet_alpha"],
        split_seed=c["split_seed"], min_client_size=c["min_client_size"], num_rounds=c["num_rounds"],
        local=c["local"], dp={k: v for k, v in dp.items() if k != "enabled"} if dp.get("enabled") else None,
        eval_every=c["eval_every"], seed=c["seed"], device=device,
    )


def _summary(out: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in out.items() if k not in ("model", "strategy")}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    role = args[0]
    if role not in ROLES:
        print(f"error: unknown role {role!r}; roles: {', '.join(ROLES)}\n{USAGE}", file=sys.stderr, end="")
        return 2
    from ..train import config_dir, run_hydra

    conf = config_dir() / "federated"

    def task(cfg: Any) -> None:
        from ..core.config import whole_number
        from ..train import discard_hydra_run_dir
        from ._deps import FederatedDependencyMissing

        try:
            from . import simulation

            fcfg = config_from(cfg)
            partition_id = whole_number(cfg.partition_id, "partition_id", 0) if role == "client" else 0
            if partition_id >= fcfg.num_clients:
                raise ValueError(f"partition_id must be in [0, {fcfg.num_clients}), got {partition_id}")
        except (FederatedDependencyMissing, ValueError, TypeError) as e:
            # flwr/opacus missing (with the pip command) or a bad option: a short message and exit 2
            # before any work, not Hydra's traceback
            discard_hydra_run_dir()
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if role == "client":
            simulation.connect(fcfg, partition_id, address=str(cfg.address))
            return
        out = simulation.run_simulation(fcfg) if role == "simulate" else simulation.serve(fcfg, address=str(cfg.address))
        text = json.dumps(_summary(out), indent=2, default=float)
        print(text, flush=True)
        if cfg.output:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.output).write_text(text + "\n")

    from ..train import ConfigError

    try:
        run_hydra(task, conf, "config", f"python -m lightning_lora.federated {role}", args[1:])
    except ConfigError as e:  # an override Hydra cannot apply
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
