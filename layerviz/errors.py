"""The errors more than one module raises (below everything else: no layerviz imports)."""


class NonFiniteLossError(RuntimeError):
    """A training or probe loss became NaN/inf. The message names where (step, batch, layer) and where the
    last good state is: fine-tuning saves it to its checkpoint, adapters are reset to it."""
