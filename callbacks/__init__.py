"""Lightning callbacks of diep_lightning, installed as ``diep_lightning.callbacks``."""
