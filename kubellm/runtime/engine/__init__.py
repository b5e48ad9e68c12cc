"""Engine core: sequences, block manager, scheduler, engine."""
