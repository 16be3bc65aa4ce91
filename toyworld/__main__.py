"""python -m toyworld: build the toy world (toy/) and its SFT model. See toyworld/build.py."""
from toyworld import build

if __name__ == "__main__":
    build.main()
