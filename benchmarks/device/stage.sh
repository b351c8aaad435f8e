# One call's part: `bash benchmarks/device/stage.sh N` moves .gpu/pN to /root/stage, where the
# parts gather while the machine stays warm (30 s between calls; a fresh machine is bare).
set -e
mkdir -p /root/stage
mv ".gpu/p$1"/* /root/stage/
echo "staged part $1: $(ls /root/stage | wc -l) files, $(du -sh /root/stage | cut -f1)"
