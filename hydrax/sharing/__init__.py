"""Prefix sharing: from token-id sequences (or an explicit hierarchy) to Hydragen levels.

  plan(sequences, *, min_shared_tokens=1024, merge_cost=16, max_levels=None,
       buckets=DEFAULT_BUCKETS) -> SharingPlan
  from_tree(tree, *, min_shared_tokens=0, merge_cost=0, max_levels=None,
            buckets=DEFAULT_BUCKETS, vocab_size=32000, seed=0) -> SharingPlan
  hierarchy(prefix, problems, samples_per_problem, *, sample_tokens=0, **from_tree options)
      -> SharingPlan                                   the paper's few-shot/problem/sample tree
  SharingPlan, PlanLevel, PlanStats, StoredLayout, Node, Buckets

Modules: `planning` (plan, SharingPlan; the cost model is in its docstring), `explicit`
(from_tree, hierarchy), `buckets` (the bucket policy), `radix` (the radix-tree algorithm).
"""

from hydrax.sharing.buckets import DEFAULT as DEFAULT_BUCKETS
from hydrax.sharing.buckets import EXACT as EXACT_BUCKETS
from hydrax.sharing.buckets import Buckets
from hydrax.sharing.explicit import Node, from_tree, hierarchy
from hydrax.sharing.planning import PlanLevel, PlanStats, SharingPlan, StoredLayout, plan

__all__ = ["plan", "from_tree", "hierarchy", "Node", "SharingPlan", "PlanLevel", "PlanStats",
           "StoredLayout", "Buckets", "DEFAULT_BUCKETS", "EXACT_BUCKETS"]
