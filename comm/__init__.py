"""Schedules, the algorithm library, and (as they land) transports, executor and tuner."""

from .algorithms import algorithm_names, build_schedule, get_algorithm
from .collectives import COLLECTIVES, CollectiveSpec
from .schedule import Schedule

__all__ = ["COLLECTIVES", "CollectiveSpec", "Schedule", "algorithm_names", "build_schedule",
           "get_algorithm"]
