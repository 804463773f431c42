"""Same as `python cli.py generate`."""
from transformer.generate import generate_command

if __name__ == "__main__":
    generate_command()
