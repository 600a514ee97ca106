"""A verify function for scorer-pool tests: workers import it by name, so it lives in a module."""

import time


def equal_or_hang(answer: str, gold: str, timeout_s: int) -> tuple[bool, bool]:
    if answer == "hang":
        time.sleep(600)  # stands for C code that SIGALRM cannot interrupt
    return answer == gold, False
