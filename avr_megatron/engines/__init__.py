"""Engines: batched chat generation and reward scoring behind one small interface."""
