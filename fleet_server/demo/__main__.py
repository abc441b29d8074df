"""``python -m fleet_server.demo``: the README's main job."""

from fleet_server.cli.demo import demo

if __name__ == "__main__":
    demo(prog_name="edgefleet demo")
