"""The BatchNorm doctor: ``diagnose(model, data) -> Report``; each hazard is a small class with evidence and fixes."""

from .diagnose import DoctorInternalError, diagnose
from .hazards import HAZARDS, Hazard
from .report import Finding, LayerSummary, Report

__all__ = ["diagnose", "DoctorInternalError", "Report", "Finding", "LayerSummary", "Hazard", "HAZARDS"]
