import sys, json
for l in sys.stdin:
    if l.startswith('{'):
        d = json.loads(l)
        print(d.get('ssig'), d.get('w'), d.get('prior'), d['layer'], d['center'], d['eps'], 'B', d['B'], 'ep', d['ep'], 'R', d['R'], 'C', d['C'], 'lr', d['lr'], d['opt'], 'sig', d['sigma'], 'steps', d['steps'], d['ba'], d['auc'], d['ba_rounds'])
    elif 'Warn' not in l:
        print(l.strip())
