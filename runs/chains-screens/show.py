import json,sys
recs=[json.loads(l) for l in open(sys.argv[1])]
c=[r for r in recs if 'curriculum' in r]
print("last:", c[-1]['step'], c[-1]['train_time_s'], c[-1]['curriculum'], "loss", round(c[-1]['loss'],3))
# stage transitions
prev=None
for r in c:
    k=(r['curriculum']['hops'], r['curriculum'].get('max_offset'))
    if k!=prev: print("  stage", k, "from step", r['step'], "t", r['train_time_s']); prev=k
ev=[r for r in recs if 'accuracy' in r and 'curriculum' not in r]
for r in ev[-int(sys.argv[2]) if len(sys.argv)>2 else -1:]:
    print("eval step", r['step'])
    for h,row in r['accuracy'].items(): print("  ", h, ' '.join(f'{v:.2f}' for v in row.values()))
