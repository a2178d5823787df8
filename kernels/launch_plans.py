"""A memo of launch plans per layer tables, shared by the launchers (tq_attention.py, tq_store.py).

A plan holds what a launch derives from the tables and the launch shape (constexprs, table
arguments); the launchers look it up by a small tuple on every call instead of rebuilding it.
Weakly keyed by the tables: a layer's plans go when its tables do.
"""

import weakref


class LaunchPlans:
    def __init__(self, make):
        self._make = make  # make(tables, *key) -> plan
        self._by_tables = weakref.WeakKeyDictionary()

    def get(self, tables, key: tuple):
        plans = self._by_tables.get(tables)
        if plans is None:
            plans = self._by_tables[tables] = {}
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = self._make(tables, *key)
        return plan
