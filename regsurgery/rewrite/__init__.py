"""Apply a plan to the same model object (masking and skip insertion, slot rates) and strip it."""

from .apply import PlanMismatchError, apply_plan, inserted_modules, is_patched, plan_of, strip

__all__ = ["PlanMismatchError", "apply_plan", "inserted_modules", "is_patched", "plan_of", "strip"]
