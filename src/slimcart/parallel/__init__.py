"""Model-parallel embedding tables with plain torch.distributed (gloo on CPU, nccl on GPU): a
sharding plan, a sharded embedding collection routed with all-to-all, a sharded DeepFM, and
checkpoints that can be re-split onto a different number of ranks."""
from .checkpoint import gather_state, load_sharded, save_sharded
from .deepfm import ShardedDeepFM, deepfm_config, deepfm_tables, shard_deepfm
from .grads import sync_grads
from .plan import ShardingPlan, TablePlacement, plan_tables
from .sharded import ShardedEmbeddingCollection

__all__ = ["ShardedDeepFM", "ShardedEmbeddingCollection", "ShardingPlan", "TablePlacement",
           "deepfm_config", "deepfm_tables", "gather_state", "load_sharded", "plan_tables",
           "save_sharded", "shard_deepfm", "sync_grads"]
