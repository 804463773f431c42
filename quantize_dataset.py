"""Same as `python cli.py quantize`."""
from vqvae.quantize import quantize_command

if __name__ == "__main__":
    quantize_command()
