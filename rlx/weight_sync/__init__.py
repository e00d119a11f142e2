"""Weight sync stage: stream the trainer's (sharded) weights into the colocated generator.

`WeightSync(generator).push(model, version)` gathers, casts and reloads one decoder layer per call
(see push.py for the data path).
"""

from rlx.weight_sync.push import WeightSync, layer_buckets

__all__ = ["WeightSync", "layer_buckets"]
