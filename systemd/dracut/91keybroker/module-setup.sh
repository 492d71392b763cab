#!/bin/bash
# dracut module "keybroker": attested disk unlock in a systemd initramfs.
#
# Install this directory as /usr/lib/dracut/modules.d/91keybroker and add the module:
#     echo 'add_dracutmodules+=" keybroker "' > /etc/dracut.conf.d/keybroker.conf
#     dracut -f
# It installs keybroker (its Python and the packages the boot path imports), the client
# configuration and its CA bundle, /sbin/request-key with keybroker's drop-in, handoff and handler,
# and keybroker's units, enabled in the image as they are on the host. When the
# configuration maps a volume it asks for the network (rd.neednet=1).
#
# Settings (in a dracut.conf.d file), with their defaults:
#     keybroker_bin=/usr/local/bin/keybroker          the command the units run
#     keybroker_config=/etc/keybroker/client.toml     the configuration the units read
#     keybroker_unitdir=/etc/systemd/system           where the keybroker units are installed

_keybroker_units="keybroker-keyfile.socket keybroker-keyfile.service keybroker-askpass.path
    keybroker-askpass.service keybroker-unlock@.service"
_keybroker_dropin=/etc/request-key.d/keybroker.conf

# called by dracut
check() {
    require_binaries keyctl request-key || return 1
    [[ -x ${keybroker_bin:-/usr/local/bin/keybroker} ]] || return 1
    [[ -f $_keybroker_dropin ]] || return 1
    # Only when asked for (add_dracutmodules): it brings Python and the network into the image.
    return 255
}

# called by dracut
depends() {
    echo systemd crypt network
    return 0
}

# called by dracut
cmdline() {
    echo "rd.neednet=1"
}

# called by dracut
installkernel() {
    # configfs-tsm and the guest drivers that provide its reports; vsock and its virtio transport
    # for SEV and SEV-ES guests, whose evidence comes from the host's broker ([aeb]) over vsock
    hostonly='' instmods tsm tsm_report sev-guest tdx-guest arm-cca-guest vsock vmw_vsock_virtio_transport
}

# called by dracut
install() {
    local bin=${keybroker_bin:-/usr/local/bin/keybroker}
    local conf=${keybroker_config:-/etc/keybroker/client.toml}
    local unitdir=${keybroker_unitdir:-/etc/systemd/system}
    local python handoff handler_conf kind value unit link wants target
    local -a files=() libraries=()
    local volumes=""

    # The request-key drop-in names the handoff and the configuration the handler reads. No agent
    # runs in the initramfs: the handoff runs the handler beside it.
    read -r handoff handler_conf < <(awk '$1 == "create" {
        for (i = 6; i < NF; i++) if ($i == "--config") { print $5, $(i + 1); exit } }' "$_keybroker_dropin")
    if [[ -z $handoff || -z $handler_conf ]]; then
        derror "keybroker: cannot read the handoff and its --config from $_keybroker_dropin"
        return 1
    fi
    inst_multiple keyctl request-key "$_keybroker_dropin" "$bin" "$handoff" "${handoff%/*}/keybroker-request-key"
    inst_multiple -o /etc/request-key.conf

    # Everything Python needs, as the interpreter of the keybroker command reports it.
    python=$(sed -n '1s/^#![[:space:]]*//p' "$(readlink -f "$bin")")
    if ! "$python" -m keybroker.guest.unlock.initramfs "$conf" "$handler_conf" > "$DRACUT_TMPDIR/keybroker.list"; then
        derror "keybroker: $python -m keybroker.guest.unlock.initramfs failed"
        return 1
    fi
    while read -r kind value; do
        case $kind in
            file) if [[ $value == *.so || $value == *.so.* || ( -x $value && $value != *.py ) ]]; then
                      libraries+=("$value")
                  else
                      files+=("$value")
                  fi ;;
            volume) volumes+=" $value" ;;
        esac
    done < "$DRACUT_TMPDIR/keybroker.list"
    # Python sources are data: no dependency resolution (some stdlib modules name interpreters
    # such as /usr/local/bin/python in their #! lines). Programs and libraries: with theirs.
    DRACUT_RESOLVE_DEPS='' inst_multiple "${files[@]}" || return 1
    inst_multiple "${libraries[@]}" || return 1
    # They are imported, never run: dracut's final pass must not chase their #! lines either.
    for value in "${files[@]}"; do
        [[ $value == *.py && -x $initdir$value ]] && chmod a-x "$initdir$value"
    done

    for unit in $_keybroker_units; do
        if [[ -f $unitdir/$unit ]]; then
            inst_simple "$unitdir/$unit" "$systemdsystemunitdir/$unit"
        else
            inst_simple "$systemdsystemunitdir/$unit" || dwarn "keybroker: $unit is not installed"
        fi
    done
    # Enable in the image what is enabled on the host (systemctl enable ... creates these links).
    for link in "$unitdir"/*.wants/keybroker-*; do
        [[ -L $link ]] || continue
        wants=${link%/*}
        target=$(readlink "$link")
        mkdir -p "$initdir$systemdsystemconfdir/${wants##*/}"
        ln_r "$systemdsystemunitdir/${target##*/}" "$systemdsystemconfdir/${wants##*/}/${link##*/}"
    done

    if [[ -n $volumes ]]; then
        dinfo "keybroker: volumes$volumes are mapped: asking for the network"
        mkdir -p "$initdir/etc/cmdline.d"
        cmdline > "$initdir/etc/cmdline.d/91keybroker.conf"
    fi
}
