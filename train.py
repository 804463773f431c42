"""Same as `python cli.py train`."""
from transformer.train import train_command

if __name__ == "__main__":
    train_command()
