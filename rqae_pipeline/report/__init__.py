"""Plots and static HTML reports."""
