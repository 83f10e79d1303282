#!/usr/bin/env python3
# Every 0.5 s, kernel TCP memory by kind of socket during the drain scenario:
# the proxy (tcplb or haproxy) toward the clients (its most common local
# port) and toward the host, the echo host (the test process's most common
# local port) and the clients. Run beside the test; kill it afterwards.
# usage: python3 docs/bench/drain-roles.py OUT.log
import subprocess, re, time, sys, collections
out = open(sys.argv[1] if len(sys.argv) > 1 else '/tmp/roles.log', 'w')
t0 = time.time()
while True:
    txt = subprocess.run(['ss', '-tmnpHO', 'state', 'established'], capture_output=True, text=True).stdout
    socks = []
    lines = txt.split('\n')
    for i, line in enumerate(lines):
        m = re.search(r'(\S+):(\d+)\s+(\S+):(\d+)\s+users:\(\("([^"]+)"', line)
        if not m: continue
        sk = re.search(r'skmem:\(r(\d+),rb(\d+),t(\d+),tb(\d+),f(\d+),w(\d+),o\d+,bl\d+,d(\d+)', line)
        if not sk: continue
        socks.append((m.group(5), int(m.group(2)), int(m.group(4)), [int(x) for x in sk.groups()]))
    proxies = [s for s in socks if s[0] in ('tcplb', 'haproxy')]
    tests = [s for s in socks if s[0] not in ('tcplb', 'haproxy')]
    if not proxies:
        time.sleep(0.5); continue
    lport = collections.Counter(s[1] for s in proxies).most_common(1)[0][0]
    hport = collections.Counter(s[1] for s in tests).most_common(1)[0][0] if tests else 0
    roles = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
    for name, lp, rp, (r, rb, t, tb, f, w, d) in socks:
        if name in ('tcplb', 'haproxy'):
            role = 'proxy<-client' if lp == lport else 'proxy->host'
        elif lp == hport: role = 'host'
        elif rp == lport: role = 'client'
        else: role = 'other'
        a = roles[role]; a[0] += 1; a[1] += r; a[2] += w; a[3] += rb; a[4] += d
    mem = open('/proc/net/sockstat').read()
    pages = int(re.search(r'TCP:.*mem (\d+)', mem).group(1))
    desc = ' '.join(f"{k}:n{v[0]},r{v[1]>>20}M,w{v[2]>>20}M,rb{v[3]>>20}M,d{v[4]}" for k, v in sorted(roles.items()))
    print(f"{time.time()-t0:6.1f} tcp_mem {pages*4096>>20}M {desc}", file=out, flush=True)
    time.sleep(0.5)
