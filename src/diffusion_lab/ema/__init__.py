"""Power-function EMA (EDM2) and its post-hoc reconstruction: the maths, torch only."""
