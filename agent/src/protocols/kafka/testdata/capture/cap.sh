#!/bin/sh
# usage: cap.sh NAME cmd...
name=$1; shift
rm -rf /tmp/kcap/st.$name; mkdir -p /tmp/kcap/st.$name /tmp/kcap/out
timeout 120 strace -ff -ttt -T -yy -xx -s 100000000 -e trace=read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg -o /tmp/kcap/st.$name/t "$@" > /tmp/kcap/st.$name/stdout 2>&1
port=$(cut -d: -f2 /tmp/kcap/bootstrap)
python3 /tmp/kcap/conv.py /tmp/kcap/st.$name/t $port /tmp/kcap/out $name
