"""The `cotrain` console command: one click group collecting every package's subcommands."""
import click

from shards.cli import shards_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Co-train unimodal branches with a multimodal Transformer teacher."""


main.add_command(shards_group, name="shards")

if __name__ == "__main__":
    main()
