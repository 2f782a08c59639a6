"""A population: same-shaped runs (a search's trials; a config's seed replicates) trained as one.

`fusion` holds the one rule of what may be fused, `stacking` the fused model
(several models' forward pass as one), `engine` the training of several
`loop.Run`s at once on top of the plain loop's own pieces.
"""

from pipeline.population.engine import fit_together
from pipeline.population.fusion import OWN_PER_RUN, alone, fusion_key, groups, own_per_run
from pipeline.population.stacking import Stack

__all__ = ["OWN_PER_RUN", "Stack", "alone", "fit_together", "fusion_key", "groups", "own_per_run"]
