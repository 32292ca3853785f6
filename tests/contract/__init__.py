"""Behaviour every transport and result backend must show, written once and run on each."""
