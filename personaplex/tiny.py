"""`python -m personaplex.tiny OUTDIR`: the command name the README and the demo use.

The code is personaplex.engine.tiny (the engine package holds every torch import); this module only
runs it, so importing it costs nothing.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("personaplex.engine.tiny", run_name="__main__", alter_sys=True)
