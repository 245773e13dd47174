"""Convex experiments of the SWALP paper's analysis (see README.md here)."""
