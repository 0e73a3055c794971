"""A script that is its own instance: it serves one function with the agent library.

Register it with ``session.register("shout", script=spear_nb.samples.path(
"scripts", "shout.py"))``; the session starts it with the address and secret of
its channel in the environment.
"""

from spear_nb.agent import serve


def shout(text: str) -> str:
    return text.upper() + "!"


if __name__ == "__main__":
    serve(shout)
