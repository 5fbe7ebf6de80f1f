"""placeholder replaced below"""

from __future__ import annotations

import argparse


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pass
