"""towerctl: the operator's command line for the Timmy Tower session store."""

__version__ = "0.1.0"
