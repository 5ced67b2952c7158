"""Seminar: semantic segmentation from clicks with seminar learning."""

__version__ = "0.1.0"
