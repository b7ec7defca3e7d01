"""Hostile inputs, grouped by the class of bug they probe (issue 11)."""
