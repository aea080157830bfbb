#!/bin/sh
# usage: cap.sh NAME PORT cmd...   (strace of cmd, its syscalls on TCP port PORT)
name=$1; port=$2; shift 2
rm -rf /tmp/h2cap/st.$name; mkdir -p /tmp/h2cap/st.$name /tmp/h2cap/out
timeout 120 strace -ff -ttt -T -yy -xx -s 100000000 -e trace=read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg -o /tmp/h2cap/st.$name/t "$@" > /tmp/h2cap/st.$name/stdout 2>&1
python3 /tmp/h2cap/conv.py /tmp/h2cap/st.$name/t $port /tmp/h2cap/out $name
