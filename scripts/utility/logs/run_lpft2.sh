cd /work/wt/utility/scripts/utility
R="PYTHONPATH=/work/wt/utility nice -n 10 ../../.venv/bin/python toplayers.py"
eval $R --eps 8 --start 5 --modules qv --mode ffa --rank 4 --rounds 3 --head-rounds 1 --head-epochs 20 --head-lr 0.1 --epochs 2 --lr 0.003 --clip 1
eval $R --eps 8 --start 5 --modules qv --mode ffa --rank 4 --rounds 3 --head-rounds 1 --head-epochs 20 --head-lr 0.1 --epochs 2 --lr 0.01 --clip 1
eval $R --eps 8 --start 5 --modules qv --mode vanilla --rank 4 --rounds 3 --head-rounds 1 --head-epochs 20 --head-lr 0.1 --epochs 2 --lr 0.003 --clip 1
eval $R --eps off --start 5 --modules qv --mode ffa --rank 4 --rounds 3 --head-rounds 1 --head-epochs 20 --head-lr 0.03 --epochs 2 --lr 0.003 --clip 1
