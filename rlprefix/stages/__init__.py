"""The training stages of a run, one module each: `warm_start` (supervised), `ppo` (RL), `compress`.

Each module is imported by its path (`from rlprefix.stages.ppo import ppo`); this package defines no names,
so `rlprefix.stages.ppo` is always the module, never the function of the same name.
"""
