"""The layer search (issue 21, docs/design.md §11): find the best (checkpoint, layer) without the whole grid.

`SearchSpace` (arms, features, costs), `Search` (observations in; `propose`, `posterior`,
`should_stop`, `chosen` out), the actions `Embed` and `Score`, and `layertime.search.replay` (a full
grid as an oracle that counts what is asked). Plain Python: no Prefect or Dask.
"""

from layertime.search.search import Action, Choice, Embed, Posterior, Score, Search, Stop
from layertime.search.space import Arm, SearchSpace

__all__ = ["Action", "Arm", "Choice", "Embed", "Posterior", "Score", "Search", "SearchSpace", "Stop"]
