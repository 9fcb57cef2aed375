"""Mutation testing of tokendb's money paths and of its database backstops.

``python -m tests.mutation run`` (cosmic-ray over the modules of
:data:`tests.mutation.targets.TARGETS`) and ``python -m tests.mutation
backstops`` (each CHECK, trigger and unique index of the migrated schema
removed or weakened in turn); see ``tests/MUTATION.md``.
"""
