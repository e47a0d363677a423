#!/bin/busybox sh
# The matrix guest's /init (busybox): load the modules the kernel lacks,
# mount the host's root read-only over virtio-9p under a writable overlay,
# give it fresh /proc /sys /dev /run and the BPF-related file systems, and
# run the host-written script named by tracer.run= on the kernel command
# line inside it. Its output and a final "TRACER-MATRIX-EXIT <code>" line go
# to the virtio-serial port named "out"; then the machine powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || echo "matrix-init: insmod $m failed"
done
script=$(sed -n 's/.*tracer\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
# The port appears once the host has answered the driver: wait for it (5 s).
port=
for i in $(seq 50); do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = out ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] && [ -e "$port" ] && break
    port=
    sleep 0.1
done
if [ -z "$port" ]; then
    echo "matrix-init: no virtio-serial port named out"
    port=/dev/console
fi
fail() {
    echo "matrix-init: $*" >"$port"
    echo "TRACER-MATRIX-EXIT 125" >"$port"
    sync
    reboot -f
}

mkdir -p /host /rw /root
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 host /host \
    || fail "could not mount the host's root over 9p"
mount -t tmpfs -o size=1G tmpfs /rw
mkdir -p /rw/upper /rw/work
# Writes (/tmp, /root, ...) go to the tmpfs; the host's files, /tmp's too, show through.
if ! mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /root; then
    # Without an overlay the root stays read-only but for a fresh /tmp.
    mount --bind /host /root
    mount -t tmpfs tmpfs /root/tmp
fi
mount -t proc proc /root/proc
mount -t sysfs sysfs /root/sys
mount -t devtmpfs devtmpfs /root/dev
mkdir -p /root/dev/pts /root/dev/shm
mount -t devpts devpts /root/dev/pts
mount -t tmpfs tmpfs /root/dev/shm
mount -t tmpfs tmpfs /root/run
mount -t tracefs tracefs /root/sys/kernel/tracing
mount -t debugfs debugfs /root/sys/kernel/debug
mount -t bpf bpf /root/sys/fs/bpf
mount -t cgroup2 cgroup2 /root/sys/fs/cgroup
hostname matrix

chroot /root /bin/sh "$script" >"$port" 2>&1
echo "TRACER-MATRIX-EXIT $?" >"$port"
sync
reboot -f
