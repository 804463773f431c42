"""Same as `python cli.py train-vqvae`."""
from vqvae.train import train_vqvae_command

if __name__ == "__main__":
    train_vqvae_command()
