cd /work/wt/utility/scripts/utility
R="PYTHONPATH=/work/wt/utility nice -n 10 ../../.venv/bin/python toplayers.py"
eval $R --eps off --start 3 --pooling mix --modules all --rank 8 --rounds 4 --head-rounds 1 --head-epochs 20 --head-lr 0.01 --epochs 2 --lr 0.001 --stat-clip 4.5 --stat-sigma 10
eval $R --eps off --start 3 --pooling last --modules all --rank 8 --rounds 4 --head-rounds 1 --head-epochs 20 --head-lr 0.01 --epochs 2 --lr 0.001 --stat-clip 4.5 --stat-sigma 10
