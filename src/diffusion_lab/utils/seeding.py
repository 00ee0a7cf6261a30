"""Seeds that are pure functions of what they seed, so that randomness survives interruption and resume."""

import hashlib


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (seed, rank, step, purpose): training randomness
    drawn from it is the same whether or not a run was interrupted and resumed."""
    digest = hashlib.blake2b("-".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
