cd /work/wt/utility/scripts/utility
R="PYTHONPATH=/work/wt/utility nice -n 10 ../../.venv/bin/python toplayers.py --task reviews --max-length 128 --weights 0.77,1.43 --stat-clip 4.5 --stat-sigma 10"
eval $R --eps 8 --start 5 --modules qv --mode ffa --rank 4 --rounds 3 --head-rounds 1 --head-epochs 20 --head-lr 0.03 --epochs 2 --lr 0.003
eval $R --eps 8 --start 5 --modules all --mode vanilla --rank 8 --rounds 3 --head-rounds 1 --head-epochs 20 --head-lr 0.03 --epochs 2 --lr 0.003
eval $R --eps 8 --start 5 --modules qv --mode ffa --rank 4 --rounds 3 --head-rounds 3 --head-epochs 20 --head-lr 0.03
