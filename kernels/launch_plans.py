"""A memo of launch plans per layer tables, shared by the launchers (tq_attention.py, tq_store.py).

A plan holds what a launch derives from the tables and the launch shape (constexprs, table
arguments); the launchers look it up by a small tuple on every call instead of rebuilding it.
Keyed by id(tables), each entry dropped when its tables are collected (weakref.finalize runs
before the id can be reused): a dict lookup, not a weak reference made per call.
"""

import weakref


class LaunchPlans:
    def __init__(self, make):
        self._make = make  # make(tables, *key) -> plan
        self._by_tables = {}

    def get(self, tables, key: tuple):
        plans = self._by_tables.get(id(tables))
        if plans is None:
            plans = self._by_tables[id(tables)] = {}
            weakref.finalize(tables, self._by_tables.pop, id(tables), None)
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = self._make(tables, *key)
        return plan

    def plans(self, tables) -> list:
        """The plans made so far for these tables (for reports: what a launch chose)."""
        return list(self._by_tables.get(id(tables), {}).values())
