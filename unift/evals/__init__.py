"""Evaluation pieces behind `unift eval`: likelihood scoring, answer extraction, text metrics, exams, reports."""
