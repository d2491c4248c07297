"""Executors: drive one worker in-process, or one per tensor-parallel rank."""
