"""python -m study: the paper's ablations on the toy world. See study/ablations.py."""
from study import ablations

if __name__ == "__main__":
    ablations.main()
