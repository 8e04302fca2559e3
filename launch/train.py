#!/usr/bin/env python
"""Train with dstrain. Under the deepspeed launcher:  deepspeed launch/train.py +model=7b +zero=3
On one process:  python launch/train.py    Show the composed config:  python launch/train.py --cfg job"""

from dstrain.launch import main

if __name__ == "__main__":
    main()
