cd /work/wt/utility/scripts/utility
R="PYTHONPATH=/work/wt/utility nice -n 10 ../../.venv/bin/python toplayers.py"
for lr in 0.01 0.03; do
  eval $R --eps 8 --start 5 --modules all --rounds 3 --head-rounds 1 --head-epochs 20 --head-lr 0.1 --epochs 2 --lr $lr --clip 1
done
eval $R --eps 8 --start 5 --modules all --rounds 3 --head-rounds 3 --head-epochs 20 --head-lr 0.1 --clip 1
