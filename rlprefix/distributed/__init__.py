"""Several processes: process groups (`groups`), what a sharded model needs the rest of rlprefix to keep in step
(`collectives`), and FSDP2 sharding of the frozen base (`fsdp`). Knows torch, not the rest of rlprefix."""
from rlprefix.distributed.groups import Dist, DistributedConfig, strategy_of

__all__ = ["Dist", "DistributedConfig", "strategy_of"]
